"""Data: message transforms, datasets from files, packing, collate and the data check.

Batches follow the Batch contract of docs/design.md: labels are already shifted and
``CROSS_ENTROPY_IGNORE_INDEX`` (-100) marks positions without a loss.
"""

from tunekit.data.collate import packed_collate, padded_collate
from tunekit.data.datasets import (
    SFTDataset,
    chat_dataset,
    instruct_dataset,
    split_indices,
    text_completion_dataset,
)
from tunekit.data.errors import DataError
from tunekit.data.labels import CROSS_ENTROPY_IGNORE_INDEX, shift_labels
from tunekit.data.messages import (
    AlpacaToMessages,
    ChosenRejectedToMessages,
    InputOutputToMessages,
    Message,
    OpenAIToMessages,
    ShareGPTToMessages,
    TextToDocument,
    UnpairedPreferenceToMessages,
    detect_format,
    validate_messages,
)
from tunekit.data.mixing import MixedDataset, mix_datasets
from tunekit.data.packing import PackedDataset, greedy_pack, pack_dataset
from tunekit.data.preference import (
    KTODataset,
    PreferenceDataset,
    collate_sequence_pairs,
    kto_collate,
    kto_dataset,
    preference_collate,
    preference_dataset,
)
from tunekit.data.sources import load_rows
from tunekit.modules.masks import block_causal_mask  # re-exported: what packed batches use

__all__ = [
    "CROSS_ENTROPY_IGNORE_INDEX", "DataError", "Message",
    "AlpacaToMessages", "InputOutputToMessages", "ShareGPTToMessages", "OpenAIToMessages",
    "ChosenRejectedToMessages", "UnpairedPreferenceToMessages", "TextToDocument", "detect_format",
    "validate_messages",
    "load_rows", "split_indices", "shift_labels",
    "SFTDataset", "PreferenceDataset", "KTODataset", "PackedDataset",
    "instruct_dataset", "chat_dataset", "text_completion_dataset", "preference_dataset", "kto_dataset",
    "greedy_pack", "pack_dataset", "mix_datasets", "MixedDataset",
    "padded_collate", "packed_collate", "preference_collate", "kto_collate", "collate_sequence_pairs",
    "block_causal_mask",
]
