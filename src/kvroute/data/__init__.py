"""Data: text packing, context-QA records and the fictional QA generator."""
