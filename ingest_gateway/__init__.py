"""The ingest gateway: HTTP in front of NATS JetStream (see ``ingest_gateway.app``)."""
