"""Operations: the local broker, topics, configuration, Kafka clients and the `tba` CLI."""
