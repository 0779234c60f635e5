"""Federated finetuning on Flower: adapters trained across clients that never share their data.

``tuneforge federated cfg.yaml`` starts a Flower SuperLink and one SuperNode per client on loopback
(``launch.py``) and runs the apps of ``apps.py`` on them; the same apps run on real machines. The
ClientApp trains with ``tuneforge.train`` on its own partition (``data.py``, ``partition.py``); the
ServerApp screens and averages the updates (``updates.py``). Flower (``pip install tuneforge[federated]``)
is imported only by ``apps.py`` and ``launch.py``.
"""
