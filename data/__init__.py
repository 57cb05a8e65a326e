"""The RetriBooru dataset: format, loader, concept crops, synthetic generator (docs/design.md section 4)."""
