// Validate custom resources (KEDA, Prometheus Operator) against their CRD schemas, as the
// @kubernetes-models packages carry them. Reads a JSON array of resources on stdin; prints one
// line a resource; exits 1 when any is invalid or of a kind it does not know.
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = { ScaledObject, TriggerAuthentication, PrometheusRule, ServiceMonitor };
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
let failed = false;
for (const resource of JSON.parse(Buffer.concat(chunks).toString("utf8"))) {
  const Model = models[resource.kind];
  const name = `${resource.kind}/${resource.metadata?.name}`;
  if (Model === undefined) {
    console.log(`unknown kind ${name}`);
    failed = true;
    continue;
  }
  try {
    new Model(resource).validate();
    console.log(`valid ${name}`);
  } catch (error) {
    console.log(`invalid ${name}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
