"""Tests that kill mutants left alive by the other unit tests (docs/testing.md, "Mutation testing")."""
