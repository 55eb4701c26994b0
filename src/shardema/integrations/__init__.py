"""Integrations with training frameworks: one callback each, importable only with its extra.

- :mod:`shardema.integrations.lightning`: a Lightning ``Callback``
  (``pip install "shardema[lightning]"``).
- :mod:`shardema.integrations.transformers`: a Hugging Face ``TrainerCallback``
  (``pip install "shardema[transformers]"``).

``import shardema`` never imports these frameworks; importing an integration without its
extra raises an ``ImportError`` that names the pip command. See docs/integrations.md.
"""

__all__: list[str] = []
