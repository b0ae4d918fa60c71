//! The conformance kit against RabbitMQ (see `scripts/brokers`).

courier_core::conformance_tests!(courier_contract_tests::AmqpHarness);
