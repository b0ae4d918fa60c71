//! The conformance kit against PostgreSQL (see `scripts/brokers`).

courier_core::conformance_tests!(courier_contract_tests::PostgresHarness);
