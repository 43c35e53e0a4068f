# Production image: a static binary on a distroless base.
FROM golang:1.22 AS build
WORKDIR /src
COPY . .
RUN CGO_ENABLED=0 go build -o /out/app .

FROM gcr.io/distroless/static
COPY --from=build /out/app /app
ENV PORT={{port}}
EXPOSE {{port}}
ENTRYPOINT ["/app"]
