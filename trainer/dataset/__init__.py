"""Instruction data: task preparation, the grounding probe's questions, the tokenised instruction
dataset and the packing collator."""
