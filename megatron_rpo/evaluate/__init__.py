"""Did it work? Win rates of trained models the way the paper measures them (``python -m
megatron_rpo.evaluate``): held-out prompts (:mod:`.items`), responses from exported models or
endpoints (:mod:`.generation`, :mod:`.endpoint`), judges (:mod:`.judges`), win rates with their
standard error (:mod:`.winrate`), the run and its table (:mod:`.run`), AlpacaEval answers
(:mod:`.alpaca`). docs/evaluation.md is the guide.
"""
