from fhir_server import fhir_server, fhir_server_auth  # noqa: F401
from postgres import postgres_server, postgres_url  # noqa: F401
from support import listener  # noqa: F401
