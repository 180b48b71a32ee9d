// Interactive API documentation from the app's own OpenAPI; Swagger UI is served from this
// package, so nothing loads from the internet and no inline script is needed.
window.addEventListener("load", function () {
  window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: false,
  });
});
