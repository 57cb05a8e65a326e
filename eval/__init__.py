"""Evaluation (paper Sec. 3.1, Sec. 4, Supp. A.2): metrics.py (CLIP-I, CLIP-T, VQA score, SWD on
features), embed.py (CLIP features of files and texts, cached), manifest.py (the JSONL inputs),
score.py (Tab. 3 tables), plots.py (PIL scatter plots), `python -m eval` (scoring) and
`python -m eval.protocol` (generating the evaluation grid). See eval/README.md."""
