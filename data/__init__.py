"""The RetriBooru dataset: format, loader, concept crops, synthetic generator and its ground-truth scorers
(docs/design.md section 4)."""
