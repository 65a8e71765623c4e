"""Coverage-guided fuzzing of fleet's decoders (atheris); see fuzz/README.md.

``fuzz.targets`` holds the targets (plain functions, no atheris import),
``fuzz.harness`` runs one under atheris, ``fuzz.run`` is the long run and
``fuzz.seed`` writes the seed inputs of ``fuzz/corpus/<target>/``.
"""
