"""Request state kept between steps, KV cache memory, and the execution of one step."""
