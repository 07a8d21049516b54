"""The outbox relay service (deployed on its own): publishes outbox rows to Kafka."""
