"""Integrations with training frameworks and loggers (optional extras).

Each lives in its own module and imports its framework only when that module is imported; ``import
lipfast`` imports none of them::

    from lipfast.integrations.transformers import LipfastCallback   # pip install "lipfast[hf]"
    from lipfast.integrations.lightning import LipfastCallback      # pip install "lipfast[lightning]"
    from lipfast.integrations.tensorboard import TensorBoardWriter  # pip install "lipfast[tensorboard]"
    from lipfast.integrations.parquet import ParquetWriter          # pip install pyarrow
"""
