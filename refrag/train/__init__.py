"""Training: reconstruction -> continual pre-training -> mixed input, one readable recipe per stage.

Recipes (``reconstruct``, ``cpt``, ``mixed``) share one loop (:mod:`refrag.train.loop`), one data stream
(:mod:`refrag.train.data`) and the paper's curriculum (:mod:`refrag.train.curriculum`).
"""
