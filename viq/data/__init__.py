"""Training data: the JSON/JSONL sample format, a word tokenizer, and a synthetic shapes set."""

from viq.data.conversations import (IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN, TEMPLATES, BadSample,
                                    ChatTemplate, EncodedSample, ImageRef, Resize, Sample, SampleSet,
                                    TextTokenizer, Turn, WordTokenizer, encode_conversation, load_samples,
                                    parse_resize, read_records, sample_texts, validate_sample)
from viq.data.synthetic import (ShapeAttributes, ShapesDataset, caption, caption_vocabulary,
                                make_shapes_dataset, parse_caption)

__all__ = [
    "IGNORE_INDEX", "IMAGE_PLACEHOLDER_ID", "IMAGE_TOKEN", "TEMPLATES", "BadSample", "ChatTemplate",
    "EncodedSample", "ImageRef", "Resize", "Sample", "SampleSet", "TextTokenizer", "Turn", "WordTokenizer",
    "encode_conversation", "load_samples", "parse_resize", "read_records", "sample_texts", "validate_sample",
    "ShapeAttributes", "ShapesDataset", "caption", "caption_vocabulary", "make_shapes_dataset", "parse_caption",
]
