"""File names and fixed strings shared by saving, loading and collection."""

CONFIG_NAME = "ocd_config.json"
HEAD_NAME = "ocd_head.safetensors"
MODEL_CARD_NAME = "README.md"
COLLECTION_MANIFEST = "collection.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
LIBRARY_NAME = "ocd_hf"
STATE_NAME = "ocd_state.json"
