from fhir_server import fhir_server, fhir_server_auth  # noqa: F401
