//! The conformance kit against an SQS-API server (moto, see `scripts/brokers`).

courier_core::conformance_tests!(courier_contract_tests::SqsHarness);
