"""Evidence that a model retrieves: passkey / needle-in-a-haystack accuracy over a grid of
lengths × depths, and NSA's selection recall at the answer positions.

* ``python -m nsa_flex.eval ...``: evaluate one checkpoint (nsa, llama3_dense or nsa_window),
  write ``retrieval.json`` and ``retrieval.png`` (``nsa_flex.eval.cli``).
* ``python -m nsa_flex.eval.plot A.json B.json --out fig.png``: heatmaps of several results.
* ``nsa_flex.eval.retrieval``: prompts, scoring and recall, as functions.
"""
