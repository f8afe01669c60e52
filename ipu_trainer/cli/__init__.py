"""What the example scripts share: their argument dataclasses, start-up and one-line errors, hub and file
checks, config/tokenizer/model loading, dataset loading and the offline quick-start assets.
"""
