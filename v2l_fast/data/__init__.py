"""Training and evaluation data for the hypernetwork.

`manifest` reads and writes JSONL manifests in the authors' row format; `loader` batches a
manifest's videos with their questions; `synthetic` is the synthetic video world for offline
work: short clips of moving shapes with ground-truth captions and closed-vocabulary questions,
written as mp4 files and train / val / heldout manifests.
"""
