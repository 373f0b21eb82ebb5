"""Tools to build models from text: corpus + split, tokenizer training, LM training, draft distillation.

Used by tools/train_tokenizer.py, tools/train.py, tools/distill_draft.py,
tools/eval_builtin.py and tools/build_assets.py.
"""
