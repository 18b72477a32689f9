"""The platform every role stands on: configuration, errors, a job's identity, Kafka clients, topics, the
local broker, the schema store on Kafka, the one producer of TrajectoryGroups, metrics endpoints, gRPC
security. It imports the contract (schemas/) and nothing above it."""
