"""Instruction data and corpora: the formats people have, the embedded sample, the Great Expectations suite."""
