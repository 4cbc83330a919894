// Validate an AsyncAPI document with the official parser; print its diagnostics as JSON lines.
// Exit 1 when any is an error (severity 0).
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const path = process.argv[2];
const parser = new Parser();
const { diagnostics } = await parser.parse(readFileSync(path, "utf8"));
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path.join(".") }));
}
process.exit(diagnostics.some((d) => d.severity === 0) ? 1 : 0);
