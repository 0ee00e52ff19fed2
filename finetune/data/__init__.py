"""The data stage: from a JSONL file (or a data-prep directory) to the tokenized rows a Trainer reads.

    files.py          data files and data-prep manifests, chat JSONL reading, batch padding
    chat_template.py  conversations -> token ids and loss masks (the one masking rule)
    cache.py          the tokenized data cache: built once per node, memory-mapped by every rank
    kinds.py          what each kind of training data holds (chat, preference pairs, unpaired)
    preference.py     preference pairs and unpaired examples -> cached token ids
    sampler.py        the length-grouped train sampler
    prepare.py        `finetune prepare`: build the cache ahead of a launch
    preview.py        `finetune preview`: the rendered examples with their trained tokens
"""
