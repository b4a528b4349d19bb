// Render /openapi.json with Swagger UI. validatorUrl: null keeps the page from sending the
// document to the public validator at swagger.io (no request may leave this server).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
  tryItOutEnabled: false,
  defaultModelsExpandDepth: 0,
});
