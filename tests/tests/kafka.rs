//! The conformance kit against a Kafka-API broker (Tansu, see `scripts/brokers`).

courier_core::conformance_tests!(courier_contract_tests::KafkaHarness);
