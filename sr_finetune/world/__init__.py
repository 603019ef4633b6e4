"""The demo world: procedural scenes with captions, a pixel reader, a hidden taste, a simulated
community and a small base model trained on it (see README "Demo world").

Core floor: nothing here imports ``reward``; the world's judge and fidelity scorers live in
``reward/world.py`` and call these functions.
"""
