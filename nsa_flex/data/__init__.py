"""Embedded default data and tokenizer (offline), plus real data and tokenizers by name.

``corpus`` gathers the standard library into a cache; ``tokenizer`` trains/loads tokenizers;
``datasets`` registers dataset names with torchtitan (it imports torchtitan; the other two
modules import it only for the tokenizer wrappers).
"""
