"""What a method's two halves share: the contract that joins them (`contract`), and per method family the
record names, wire formats and helpers both its server half (`strategies/`) and client half (`clients/`) use.
"""
