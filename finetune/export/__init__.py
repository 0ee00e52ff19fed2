"""`finetune export`: a merged model (or an adapter alone) as GGUF for llama.cpp (gguf.py), with an
Ollama Modelfile beside it (ollama.py)."""
