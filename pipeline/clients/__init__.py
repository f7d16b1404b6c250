"""The only modules that talk to the outside: etcd (a typed boundary over the etcd client),
Redis, and Celery. Nothing else of kvmesh imports etcd3, grpc, redis, kombu or celery."""
