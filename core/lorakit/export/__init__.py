"""Export: what leaves a finished run, and the adapter folder a run saves.

``folder``       ``lorakit export``: the export folder (adapter, merged, parity, gguf), published
                 atomically; only folders marked as lorakit exports are ever replaced
``contents``     what goes into it: exported metadata, adapter folder, merged and GGUF folders,
                 model cards
``adapter_io``   the adapter folder: atomic save (weights, tokenizer, generation_config with the
                 end-of-turn stop ids, lorakit.json), its metadata, the stop ids
``merge``        QLoRA-aware merge: into an fp32 base, then cast, with finite-weight guards
``parity``       probe conversations and logit/perplexity comparison of an export vs the run
``model_card``   the README.md written into each export folder
``gguf_export``  ``--gguf``: merged GGUF files, adapter GGUF, Modelfile, parity, in order
``gguf_source``  what the GGUF files hold: the merged fp32 model, or the base as trained
``gguf_writer``  a merged model as one GGUF file (tensor layout, types)
``gguf_vocab``   the tokenizer metadata of a GGUF (byte-level BPE, pre-tokenizer, template)
``gguf_adapter`` the adapter alone as a GGUF LoRA file
``gguf_parity``  a GGUF read back with transformers' loader and compared
``modelfile``    the Ollama Modelfile (chat template translated to a Go template, or none)
``chat_families`` Llama 3, Gemma, Phi-3: reference renderers and Go templates for ``modelfile``
``chat_tools``   ChatML with tools (Qwen 2.5): reference renderer and Go template
``llama_quantize`` K-quants by llama.cpp's quantizer (found via LORAKIT_LLAMA_QUANTIZE or PATH)
``llama_cpp``    llama.cpp's libllama through ctypes in a child process (tokenize, logits, greedy)
``gguf_llama_cpp`` each GGUF run by llama.cpp against transformers (the round trip)

Nothing here imports torch at module level: ``cli/export.py`` reads ``merge.DTYPES`` for --help.
"""
