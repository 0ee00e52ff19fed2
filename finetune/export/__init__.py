"""`finetune export`: a merged model as GGUF for llama.cpp and Ollama (gguf.py)."""
