"""tidings-redis-streams: an example third-party tidings driver (scheme ``redisstreams``)."""

from tidings_redis_streams.driver import RedisStreamsDriver

__all__ = ["RedisStreamsDriver"]
