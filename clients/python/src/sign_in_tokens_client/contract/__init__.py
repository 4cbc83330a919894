"""The wire: the messages, the error codes, the lanes; nothing of AMQP or HTTP."""
