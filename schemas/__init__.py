"""The contract: Avro schemas, the one codec, and the record types that travel through Kafka."""
