"""The RetriBooru dataset: format, loader, concept crops, synthetic generator (DESIGN.md section 4)."""
