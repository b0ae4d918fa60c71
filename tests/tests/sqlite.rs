//! The conformance kit against an embedded SQLite file.

courier_core::conformance_tests!(courier_contract_tests::SqliteHarness);
