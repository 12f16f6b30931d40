"""Export a training run (`python -m dpo.export`, dpo.export.cli): the adapter and the merged model
(`merged`), GGUF files through llama.cpp's own converter (`llamacpp_convert`) and quantizer (`llamacpp`)
with their Ollama Modelfile (`modelfile`) and their verification, the adapter's presence read from the
file's weights (`gguf_weights`) (`gguf`); the run folder, outputs and verdicts they share (`common`)."""
