"""The provider: the SMSBAT client and the parsers of its pushed reports and BulkGate DLRs."""
