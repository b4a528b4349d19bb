"""The prediction service: ``gunicorn -c service/gunicorn.conf.py "service:create_app()"``.

``create_app`` is imported lazily so that ``service.config`` (read by the gunicorn config to
validate the environment) loads in milliseconds, without torch.
"""


def create_app(test_config=None):
    """The Flask application factory (see service.app.create_app)."""
    from service.app import create_app as factory

    return factory(test_config)


__all__ = ["create_app"]
