"""Parts of the Redis store (service/store/redis_store.py) with a layout of their own."""
