"""Batches from data: the masking collators, packing of several sequences per row, NSP sentence pairs from
text, and reading text files.
"""
