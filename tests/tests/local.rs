//! The conformance kit against the in-process backend.

courier_core::conformance_tests!(courier_contract_tests::LocalHarness);
